"""`ftl launch RECIPE [-o ...] [--num-processes N] [--num-machines M --machine-rank R
--main-process-ip IP --main-process-port P] [--dry-run] [--resume ...] [--overwrite]`.

Plans the launch (launcher.dist.plan, pure), checks what can be checked before any
process starts, then runs the plan: one `ftl train` per process under `accelerate launch`.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher.cli.validate import add_recipe_arguments
from launcher.errors import Problem, UserError
from launcher.recipe.schema import Recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="processes on this machine (default: distributed.num_processes, else one per GPU)",
    )
    p.add_argument("--num-machines", type=int, metavar="M", help="machines in the job")
    p.add_argument("--machine-rank", type=int, metavar="R", help="this machine's rank, 0..M-1")
    p.add_argument("--main-process-ip", metavar="IP", help="address of machine 0")
    p.add_argument("--main-process-port", type=int, metavar="P", help="rendezvous port")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the command, environment and generated configs; start nothing",
    )
    p.add_argument("--resume", metavar="auto|PATH", help="passed to every `ftl train`")
    p.add_argument("--overwrite", action="store_true", help="passed to every `ftl train`")


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise UserError(
                    Problem(
                        f"cannot use port {port} on this machine: {e.strerror}",
                        key="--main-process-port",
                        hint="pick another port (1024-65535)",
                    )
                ) from None
            raise UserError(
                Problem(
                    f"port {port} is already in use on this machine (another run?)",
                    key="--main-process-port",
                    hint="pass --main-process-port with a free port, or set "
                    "distributed.main_process_port",
                )
            ) from None


def _check_inputs_exist(recipe: Recipe) -> None:
    """Missing files are reported once here, not once per process."""
    from launcher.assets import resolve_path

    problems = []
    for key, value in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if value and not resolve_path(value, base=Path.cwd()).exists():
            problems.append(Problem(f"{value} does not exist", key=key, hint="fix the path"))
    if problems:
        raise UserError(problems)


def run(args: argparse.Namespace) -> int:
    from launcher.dist import env as cluster_env
    from launcher.dist.plan import Cluster, build_plan, load_deepspeed_config
    from launcher.recipe import load_recipe

    if cluster_env.inside_launched_process(os.environ):
        raise UserError(
            Problem(
                "ftl launch is running inside a process a launcher already started",
                hint="inside torchrun / accelerate launch, run `ftl train` instead",
            )
        )
    recipe = load_recipe(args.recipe, args.override)
    found = cluster_env.from_environment(os.environ)
    explicit = args.num_machines is not None and args.machine_rank is not None
    if found.problem and not explicit:
        raise UserError(
            Problem(
                found.problem,
                key="SLURM",
                hint="run one ftl launch per node inside a job step: "
                "srun --ntasks-per-node=1 ftl launch ... (or pass --num-machines and "
                "--machine-rank yourself)",
            )
        )
    port = args.main_process_port or found.main_process_port
    if port is not None and not 1024 <= port <= 65535:
        raise UserError(
            Problem(
                f"port {port} is out of range",
                key="--main-process-port",
                hint="use a free port from 1024 to 65535",
            )
        )
    for flag in ("num_processes", "num_machines"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(
                Problem(f"must be at least 1, got {value}", key="--" + flag.replace("_", "-"))
            )
    cluster = Cluster(
        num_processes=args.num_processes,
        num_machines=args.num_machines or found.num_machines,
        machine_rank=args.machine_rank
        if args.machine_rank is not None
        else found.machine_rank or 0,
        main_process_ip=args.main_process_ip or found.main_process_ip,
        main_process_port=args.main_process_port or found.main_process_port,
        gpus=_gpu_count(),
        cpus=os.cpu_count() or 1,
    )
    ds = (
        load_deepspeed_config(recipe.distributed.deepspeed_config)
        if recipe.distributed.deepspeed_config
        else None
    )
    train_args = (["--resume", args.resume] if args.resume else []) + (
        ["--overwrite"] if args.overwrite else []
    )
    common = dict(python=sys.executable, train_args=train_args, deepspeed_config=ds)
    if args.dry_run:
        plan = build_plan(recipe, args.recipe, args.override, cluster, **common)
        if found.source:
            print(f"# cluster facts from {found.source} variables")
        print(plan.render(), end="")
        return 0
    _check_inputs_exist(recipe)
    with tempfile.TemporaryDirectory(prefix="ftl-launch-") as launch_dir:
        plan = build_plan(
            recipe, args.recipe, args.override, cluster, launch_dir=launch_dir, **common
        )
        if plan.world_size > 1 and plan.machine_rank == 0:
            _check_port_free(plan.main_port)
        for name, text in plan.files.items():
            Path(launch_dir, name).write_text(text)
        print(
            f"ftl launch: {plan.strategy}, world {plan.world_size} "
            f"({plan.processes_per_machine} x {plan.num_machines} machine(s)), {plan.accounting}",
            file=sys.stderr,
            flush=True,
        )
        for note in plan.notes:
            print(f"ftl launch: note: {note}", file=sys.stderr, flush=True)
        environ = {k: v for k, v in os.environ.items() if k not in plan.unset}
        rc = _execute(plan.argv, {**environ, **plan.env})
        return _exit_code(rc, Path(launch_dir), plan.processes_per_machine)


def _exit_code(rc: int, launch_dir: Path, processes: int) -> int:
    """torchrun reports any failing rank as exit 1: recover ftl's own codes from what the
    ranks of this machine left (2: a user error, 3: stopped after a checkpoint)."""
    if rc == 0:
        return rc
    codes = []
    for f in launch_dir.glob("exit-*"):
        try:
            codes.append(int(f.read_text()))
        except ValueError:
            continue
    if 2 in codes:
        return 2
    if codes and len(codes) == processes and set(codes) == {3}:
        return 3
    return rc


def _execute(argv: list[str], environ: dict[str, str]) -> int:
    """Run the launcher; forward SIGTERM/SIGINT/SIGUSR1 so every rank can checkpoint.

    torchrun passes SIGTERM and SIGINT on to every rank (which then save a checkpoint and
    stop) and kills them if they take longer than TORCH_ELASTIC_SHUTDOWN_TIMEOUT (the
    plan sets 600 s); SIGUSR1, which torchrun does not handle, is sent on as SIGTERM. The
    launcher runs in its own session, so a Ctrl-C in the terminal reaches it once, from here.
    """
    child = subprocess.Popen(argv, env=environ, start_new_session=True)
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in forwarded}

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    for s in forwarded:
        signal.signal(s, forward)
    try:
        while True:
            try:
                return child.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
