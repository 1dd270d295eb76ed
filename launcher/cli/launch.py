"""`ftl launch RECIPE [-o ...] [--num-processes N] [--num-machines M --machine-rank R
--main-process-ip IP --main-process-port P] [--dry-run] [--resume ...] [--overwrite]`.

Plans the launch (launcher.dist.plan, pure), checks what can be checked before any
process starts, then runs the plan: one `ftl train` per process under `accelerate launch`.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
    inputs = [("data.train", recipe.data.train), ("data.eval", recipe.data.eval)]
    inputs += [(f"data.mix[{i}].path", m.path) for i, m in enumerate(recipe.data.mix)]
    for key, value in inputs:
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
        from launcher.data.read import reads_own_shards
        from launcher.train.tasks import TASKS

        # shards per rank: refuse what cannot work before any process starts
        reads_own_shards(recipe.data, plan.world_size, TASKS[recipe.task].uses_labels)
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
        gate = _StderrGate()
        rc = _execute(plan.argv, {**environ, **plan.env}, stderr=gate)
        code = _exit_code(rc, Path(launch_dir), plan.processes_per_machine)
        gate.finish(drop_launcher_report=code in (2, 3))
        return code


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


# torchrun's own report of a failed rank: its error log line, then a ChildFailedError
# traceback, the last thing the launcher writes before it exits
_REPORT_START = re.compile(
    rb"^(Traceback \(most recent call last\):|E\d{4} [\d:.]+ \d+ \S*torch/distributed/elastic)"
)


class _StderrGate:
    """The launcher's stderr (ranks' included), copied through as it comes.

    From torchrun's failure report on, lines are held until the exit code is known: when
    the ranks left with ftl's own codes (2: a user error they already explained, 3: stopped
    after a checkpoint), the launcher's traceback about it is noise and is dropped;
    anything else held (a rank's own traceback, a real crash) is written out.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.held: list[bytes] = []
        self.out = getattr(sys.stderr, "buffer", None)
        self.thread = threading.Thread(target=self._pump, daemon=True)

    def start(self) -> None:
        os.close(self.write_fd)  # the child holds its copy
        self.thread.start()

    def _emit(self, data: bytes) -> None:
        if self.out is not None:
            self.out.write(data)
            self.out.flush()
        else:  # a text-only stream (tests capture sys.stderr)
            sys.stderr.write(data.decode(errors="replace"))
            sys.stderr.flush()

    def _pump(self) -> None:
        pending = b""
        with os.fdopen(self.read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._line(line + b"\n")
                if pending and not self.held:  # a progress bar's carriage-return update
                    self._emit(pending)
                    pending = b""
        if pending:
            self._line(pending)

    def _line(self, line: bytes) -> None:
        if self.held or _REPORT_START.match(line):
            self.held.append(line)
        else:
            self._emit(line)

    def finish(self, drop_launcher_report: bool) -> None:
        self.thread.join(timeout=30)
        kept = self.held
        if drop_launcher_report:
            kept = [x for x in kept if not _REPORT_START.match(x) or x.startswith(b"Traceback")]
            starts = [i for i, x in enumerate(kept) if x.startswith(b"Traceback")]
            if starts and b"ChildFailedError" in b"".join(kept[starts[-1] :]):
                kept = kept[: starts[-1]]
        if kept:
            self._emit(b"".join(kept))


def _execute(argv: list[str], environ: dict[str, str], stderr: _StderrGate | None = None) -> int:
    """Run the launcher; forward SIGTERM/SIGINT/SIGUSR1 so every rank can checkpoint.

    torchrun passes SIGTERM and SIGINT on to every rank (which then save a checkpoint and
    stop) and kills them if they take longer than TORCH_ELASTIC_SHUTDOWN_TIMEOUT (the
    plan sets 600 s); SIGUSR1 is sent on as SIGTERM. The launcher runs in its own
    session, so a Ctrl-C in the terminal reaches it once, from here.

    Inside a SLURM job step nothing is forwarded: SLURM signals every process of the step
    itself (torchrun and the ranks too, whatever their session), and a second copy would
    reach torchrun while it shuts down and make it abandon the ranks mid-checkpoint.
    torchrun does not handle SIGUSR1 (SLURM's time-limit warning): it would die of it and
    take the ranks with it, so it starts with SIGUSR1 ignored; each rank installs its own
    handler (launcher.train.signals) as its first act.
    """
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec by the child
    child = subprocess.Popen(
        argv,
        env=environ,
        start_new_session=True,
        stderr=stderr.write_fd if stderr else None,
    )
    if stderr:
        stderr.start()
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in forwarded}
    previous[signal.SIGUSR1] = usr1
    in_slurm_step = "SLURM_STEP_ID" in os.environ

    def forward(signum: int, _frame: object) -> None:
        if in_slurm_step:
            print(
                f"ftl launch: got {signal.Signals(signum).name}; the ranks got it from SLURM too",
                file=sys.stderr,
                flush=True,
            )
            return
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
