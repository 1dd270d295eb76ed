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
                raise
            raise UserError(
                Problem(
                    f"port {port} is already in use on this machine (another run?)",
                    key="--main-process-port",
                    hint="pass --main-process-port with a free port, or set "
                    "distributed.main_process_port",
                )
            ) from None


def _check_inputs_exist(recipe) -> None:  # noqa: ANN001 - a Recipe
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
    for flag in ("num_processes", "num_machines", "main_process_port"):
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
        rc, signalled = _execute(plan.argv, {**os.environ, **plan.env})
    return _exit_code(rc, signalled, Path(recipe.output.dir))


def _exit_code(rc: int, signalled: bool, run_dir: Path) -> int:
    """torchrun reports any rank's non-zero exit as 1: recover ftl's own codes."""
    if rc == 0 or not signalled:
        return rc
    import json

    from launcher.train.loop import EXIT_STOPPED

    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return rc
    return EXIT_STOPPED if status == "stopped" else rc


def _execute(argv: list[str], environ: dict[str, str]) -> tuple[int, bool]:
    """Run the launcher; forward SIGTERM/SIGINT/SIGUSR1 so every rank can checkpoint.

    torchrun passes SIGTERM and SIGINT on to every rank (which then save a checkpoint and
    stop) and kills them if they take more than its grace period (30 s); SIGUSR1, which
    torchrun does not handle, is sent on as SIGTERM.
    """
    child = subprocess.Popen(argv, env=environ)
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in forwarded}
    got: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        got.append(signum)
        child.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    for s in forwarded:
        signal.signal(s, forward)
    try:
        while True:
            try:
                return child.wait(), bool(got)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
