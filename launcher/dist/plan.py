"""Planning a launch: recipe + cluster facts -> LaunchPlan (argv, env, generated files).

Pure: nothing here starts a process, touches the network or writes a file, so every
plan is printable (`ftl launch --dry-run`) and unit-tested. `launcher.cli.launch`
writes `plan.files` into a fresh launch folder and runs `plan.argv` with `plan.env`.

Each process runs `ftl train` under `accelerate launch`, always with the accelerate
config generated here (a stray ~/.cache/huggingface/accelerate/default_config.yaml
never leaks in). On CPU-only hosts the plan steers around accelerate's silent
single-process traps (docs/distributed.md lists them); the training loop then checks
that the world it sees is the one planned (FTL_WORLD_SIZE) and refuses to run otherwise.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.dist.strategies import STRATEGIES, Strategy
from launcher.dist.contract import ENV_LAUNCH_DIR, ENV_STRATEGY, ENV_WORLD
from launcher.errors import Problem, UserError
from launcher.recipe.resolve import accounting, accumulation
from launcher.recipe.schema import Recipe
from launcher.train.optim import ZERO_UNTESTED

ACCELERATE_CONFIG = "accelerate.yaml"
DEEPSPEED_CONFIG = "deepspeed.json"
LAUNCH_DIR = "<launch-dir>"  # stands for the launch folder in a dry run
SHUTDOWN_GRACE_S = 600
# a rank's identity left in the environment by an outer launcher (a Kubernetes pod's
# node-level RANK/WORLD_SIZE, say) must not reach the processes this plan starts
INHERITED_RANK_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")

# DeepSpeed keys whose value the recipe owns: "auto" in a config means "fill from the recipe".
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum / train.global_batch_size",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "train.max_grad_norm",
}


# "auto" values filled from the model once it is built, in each process. accelerate fills
# the first three from the hidden size h at prepare time (buckets of h^2 elements,
# prefetch 0.9 h^2, parameters under 10 h stay whole; DeepSpeed's own 5e8-element buckets
# cost gigabytes per rank on small models). ftl fills the last three, which DeepSpeed
# counts in parameters, from the parameter count (launcher/train/distributed.py).
MODEL_AUTOS = {
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
    "zero_optimization.stage3_max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance",
    "zero_optimization.sub_group_size",
}
MODEL_AUTOS_ANY_STAGE = {"zero_optimization.reduce_bucket_size"}


@dataclass(frozen=True)
class Cluster:
    """What the command line and the environment say about where this launch runs."""

    num_processes: int | None = None  # per machine; None: recipe, else one per GPU
    num_machines: int | None = None  # None: recipe
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None  # None: recipe
    gpus: int = 0  # GPUs visible on this machine
    cpus: int = 1  # CPU cores on this machine (threads per process on CPU-only hosts)


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]  # set on top of the caller's environment
    unset: tuple[str, ...] = INHERITED_RANK_VARS  # removed from the caller's environment
    files: dict[str, str] = field(default_factory=dict)  # name in the launch folder -> text
    world_size: int = 1
    processes_per_machine: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int = 29500
    strategy: str = "none"
    accounting: str = ""
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """What `--dry-run` prints: the command, the environment and the generated files."""
        lines = [
            f"# strategy {self.strategy}: {STRATEGIES[self.strategy].summary}",
            f"# world {self.world_size} = {self.processes_per_machine} process(es) x "
            f"{self.num_machines} machine(s); this is machine {self.machine_rank}",
            f"# {self.accounting}",
            *(f"# note: {n}" for n in self.notes),
            "",
            "# environment",
            *(f"unset {k}" for k in self.unset),
            *(f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())),
            "",
            "# command",
            shlex.join(self.argv),
        ]
        for name, text in self.files.items():
            lines += ["", f"# {LAUNCH_DIR}/{name}", text.rstrip("\n")]
        return "\n".join(lines) + "\n"


def load_deepspeed_config(path: str, *, base: Path | None = None) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (a user's or one of ds_configs/); UserError if unusable."""
    from launcher.assets import resolve_path

    p = resolve_path(path, base=base or Path.cwd())
    key = "distributed.deepspeed_config"
    if not p.is_file():
        raise UserError(
            Problem(
                f"DeepSpeed config {p} does not exist",
                key=key,
                hint="fix the path, or remove the key to use ftl's ds_configs/<strategy>.json",
            )
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            Problem(
                f"DeepSpeed config {p} is not valid JSON ({e})",
                key=key,
                hint="DeepSpeed configs are JSON: check quotes, commas and brackets",
            )
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            Problem(f"DeepSpeed config {p} is not a JSON object", key=key, hint='{"...": ...}')
        )
    return data


def shipped_deepspeed_config(strategy: Strategy) -> dict[str, Any]:
    from launcher.assets import data_path

    assert strategy.ds_config is not None
    return json.loads(data_path("ds_configs", strategy.ds_config).read_text())


def fill_deepspeed_config(
    config: dict[str, Any],
    recipe: Recipe,
    strategy: Strategy,
    *,
    world_size: int,
    grad_accum: int,
    on_gpu: bool,
) -> dict[str, Any]:
    """A copy of `config` with every recipe-owned value filled in.

    "auto" is replaced by the recipe's value; an explicit value that disagrees with the
    recipe is an error (recipe and DeepSpeed must never train two different setups).
    """
    t = recipe.train
    cfg = json.loads(json.dumps(config))  # deep copy
    src = recipe.distributed.deepspeed_config or f"ds_configs/{strategy.ds_config}"
    problems: list[Problem] = []

    def own(key: str, value: Any, recipe_key: str, where: dict[str, Any] | None = None) -> None:
        d = cfg if where is None else where
        current = d.get(key, "auto")
        if current == "auto" or current == value:
            d[key] = value
        else:
            problems.append(
                Problem(
                    f"{src} sets {key}={current!r} but the recipe means {value!r}",
                    key=recipe_key,
                    hint=f'set "{key}": "auto" in the DeepSpeed config; the recipe owns it',
                )
            )

    own("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    own("gradient_accumulation_steps", grad_accum, "train.grad_accum")
    own("train_batch_size", t.micro_batch_size * grad_accum * world_size, "train.global_batch_size")
    own("gradient_clipping", float(t.max_grad_norm or 0.0), "train.max_grad_norm")
    own("enabled", t.precision == "bf16", "train.precision", cfg.setdefault("bf16", {}))
    fp16 = cfg.setdefault("fp16", {})
    if fp16.get("enabled", False) not in (False, "auto"):
        problems.append(
            Problem(
                f"{src} enables fp16; ftl trains in fp32 or bf16 (train.precision)",
                key="distributed.deepspeed_config",
                hint='set "fp16": {"enabled": false} and train.precision: bf16',
            )
        )
    fp16["enabled"] = False

    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", "auto")
    if stage == "auto":
        zero["stage"] = strategy.zero_stage
    elif stage != strategy.zero_stage:
        problems.append(
            Problem(
                f"{src} has zero_optimization.stage {stage} but distributed.strategy is "
                f"{strategy.name} (stage {strategy.zero_stage})",
                key="distributed.strategy",
                hint=f"use strategy zero{stage}"
                + ("/zero3_offload" if stage == 3 else "")
                + " with this file, or change its stage",
            )
        )
    if "scheduler" in cfg:
        problems.append(
            Problem(
                f"{src} has a scheduler block; ftl drives the learning rate itself",
                key="distributed.deepspeed_config",
                hint='remove "scheduler" and set train.scheduler / train.warmup_* instead',
            )
        )
    if "optimizer" in cfg:
        opt = cfg["optimizer"]
        if t.optimizer != "adamw" or str(opt.get("type", "")).lower() not in ("adamw", "adam"):
            problems.append(
                Problem(
                    f"{src} builds optimizer {opt.get('type')!r}; the recipe asks for "
                    f"{t.optimizer}",
                    key="train.optimizer",
                    hint="use train.optimizer: adamw with a DeepSpeed optimizer block, or "
                    "remove the block so ftl builds the recipe's optimizer",
                )
            )
        params = opt.setdefault("params", {})
        for k, v in (
            ("lr", t.lr),
            ("betas", list(t.betas)),
            ("eps", t.eps),
            ("weight_decay", t.weight_decay),
        ):
            own(k, v, f"train.{k}", params)
        if str(opt.get("type", "")).lower() == "adam":
            params.setdefault("adam_w_mode", True)
    if t.optimizer in ZERO_UNTESTED and "optimizer" not in cfg:
        # ZeRO shards any torch optimizer's states; DeepSpeed only asks for this opt-in
        cfg.setdefault("zero_allow_untested_optimizer", True)
    if not on_gpu:
        # CPU-only host: there is no pinned memory and no CUDA stream to overlap with
        for name in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(name), dict):
                zero[name]["pin_memory"] = False
        zero["overlap_comm"] = False
    if zero.get("stage") == 3 and recipe.output.save_model:
        # the final model is gathered from the shards; without this DeepSpeed refuses
        # only after the whole run
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            problems.append(
                Problem(
                    f"{src} sets stage3_gather_16bit_weights_on_model_save false, so the "
                    "final model could not be saved",
                    key="distributed.deepspeed_config",
                    hint="set it true, or output.save_model: false",
                )
            )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if isinstance(zero.get("offload_optimizer"), dict) and "optimizer" not in cfg:
        if t.optimizer != "adamw":
            problems.append(
                Problem(
                    f"{src} offloads the optimizer, which DeepSpeed runs as its CPU Adam; "
                    f"train.optimizer {t.optimizer} would be replaced silently",
                    key="train.optimizer",
                    hint="use train.optimizer: adamw with optimizer offload",
                )
            )
    model_autos = MODEL_AUTOS if zero.get("stage") == 3 else MODEL_AUTOS_ANY_STAGE
    leftover = sorted(set(_autos(cfg)) - model_autos)
    if leftover:
        problems.append(
            Problem(
                f'{src} has "auto" values ftl does not own: {", ".join(leftover)}',
                key="distributed.deepspeed_config",
                hint="give them explicit values",
            )
        )
    if problems:
        raise UserError(problems, title="the DeepSpeed config disagrees with the recipe:")
    return cfg


def _autos(d: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _autos(v, f"{prefix}{k}.")
    elif d == "auto":
        out.append(prefix.rstrip("."))
    return out


def build_plan(
    recipe: Recipe,
    recipe_path: str,
    overrides: list[str],
    cluster: Cluster,
    *,
    python: str,
    train_args: list[str] | None = None,
    deepspeed_config: dict[str, Any] | None = None,
    launch_dir: str = LAUNCH_DIR,
) -> LaunchPlan:
    """The launch for `recipe` on `cluster`.

    `deepspeed_config` is the user's file already read (`load_deepspeed_config`); when None
    the strategy's file from ds_configs/ is used. Raises UserError for anything impossible.
    """
    d = recipe.distributed
    strategy = STRATEGIES[d.strategy]
    on_gpu = cluster.gpus > 0
    machines = cluster.num_machines or d.num_machines
    per_machine = cluster.num_processes or (
        d.num_processes if d.num_processes != "auto" else max(cluster.gpus, 1)
    )
    port = cluster.main_process_port or d.main_process_port
    problems = []
    if cluster.machine_rank >= machines or cluster.machine_rank < 0:
        problems.append(
            Problem(
                f"machine rank {cluster.machine_rank} with {machines} machine(s)",
                key="--machine-rank",
                hint=f"ranks go from 0 to {machines - 1}",
            )
        )
    if machines > 1 and not cluster.main_process_ip:
        problems.append(
            Problem(
                f"{machines} machines need the address of machine 0",
                key="--main-process-ip",
                hint="pass --main-process-ip HOST (under SLURM it is found automatically)",
            )
        )
    if on_gpu and per_machine > cluster.gpus:
        problems.append(
            Problem(
                f"{per_machine} processes per machine but only {cluster.gpus} GPU(s) here",
                key="--num-processes",
                hint=f"use --num-processes {cluster.gpus} or fewer",
            )
        )
    world = per_machine * machines
    if strategy.kind == "none" and world > 1:
        problems.append(
            Problem(
                f"distributed.strategy is none but {world} processes were asked for",
                key="distributed.strategy",
                hint="set -o distributed.strategy=ddp (or a ZeRO stage / fsdp)",
            )
        )
    if problems:
        raise UserError(problems, title=f"cannot launch {recipe_path}:")
    accum = accumulation(recipe.train, world)
    batch = accounting(recipe.train.micro_batch_size, accum, world)
    train_cmd = ["-m", "launcher.cli.main", "train", recipe_path]
    for o in overrides:
        train_cmd += ["-o", o]
    train_cmd += train_args or []
    common = dict(
        processes_per_machine=per_machine,
        num_machines=machines,
        machine_rank=cluster.machine_rank,
        main_address=cluster.main_process_ip or "127.0.0.1",
        main_port=port,
        strategy=strategy.name,
        accounting=batch,
        world_size=world,
    )
    env = {ENV_WORLD: str(world), ENV_STRATEGY: strategy.name, ENV_LAUNCH_DIR: launch_dir}
    notes: list[str] = []
    if (not on_gpu and world > 1) or strategy.offload:
        # torchrun would pin every process to one thread; share the cores out instead
        # (on GPUs too with offload: DeepSpeed's CPU Adam is an OpenMP loop)
        env["OMP_NUM_THREADS"] = str(max(1, cluster.cpus // per_machine))
    # a stop signal gives every rank this long to write its checkpoint (torchrun: 30 s)
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(SHUTDOWN_GRACE_S)
    if world == 1 and strategy.kind != "deepspeed":
        # one process: no launcher at all, the loop is the same
        if strategy.kind != "none":
            notes.append(f"one process: strategy {strategy.name} makes no difference")
        env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
        return LaunchPlan(argv=[python, *train_cmd], env=env, notes=notes, **common)

    acc: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED", "fsdp": "FSDP"}[
            strategy.kind
        ],
        "num_processes": world,
        "num_machines": machines,
        "machine_rank": cluster.machine_rank,
        "main_process_ip": cluster.main_process_ip or "127.0.0.1",
        "main_process_port": port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "bf16" if recipe.train.precision == "bf16" else "no",
        "use_cpu": False,
        "gpu_ids": "all",
        "downcast_bf16": "no",
        "dynamo_config": {"dynamo_backend": "NO"},
        "enable_cpu_affinity": False,
    }
    files: dict[str, str] = {}
    if strategy.kind == "ddp":
        if not on_gpu:
            # accelerate's own CPU modes start ONE process (`--cpu`, MULTI_CPU configs);
            # torchrun + ACCELERATE_USE_CPU gives real gloo DDP
            env["ACCELERATE_USE_CPU"] = "true"
    elif strategy.kind == "deepspeed":
        ds = fill_deepspeed_config(
            deepspeed_config
            if deepspeed_config is not None
            else shipped_deepspeed_config(strategy),
            recipe,
            strategy,
            world_size=world,
            grad_accum=accum,
            on_gpu=on_gpu,
        )
        files[DEEPSPEED_CONFIG] = json.dumps(ds, indent=2) + "\n"
        # precision lives in the DeepSpeed file only (accelerate refuses it twice)
        del acc["mixed_precision"]
        acc["deepspeed_config"] = {
            "deepspeed_config_file": f"{launch_dir}/{DEEPSPEED_CONFIG}",
            "zero3_init_flag": ds["zero_optimization"].get("stage") == 3,
            # pdsh wants a hostfile and would start every node itself; ftl runs once per node
            "deepspeed_multinode_launcher": "standard",
        }
        if not on_gpu:
            notes.append(
                "DeepSpeed on CPU: the first run compiles its ops (~80 s), cached in "
                "$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)"
            )
    elif strategy.kind == "fsdp":
        acc["fsdp_config"] = {
            "fsdp_version": 2,
            # the unit is the model's own decoder layer class (model._no_split_modules)
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,
        }
    files = {ACCELERATE_CONFIG: yaml.safe_dump(acc, sort_keys=False), **files}
    argv = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"{launch_dir}/{ACCELERATE_CONFIG}",
        *train_cmd,  # accelerate's own -m: the script is a module
    ]
    return LaunchPlan(argv=argv, env=env, files=files, notes=notes, **common)
