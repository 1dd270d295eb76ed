"""`ftl slurm RECIPE --nodes N --gpus-per-node G [--partition ... --time ...] [--dry-run]`.

Checks everything it can, writes the resolved recipe and the batch script into the run
folder, submits the script held, records the job id, then releases it. A refused
submission leaves the folder as it was. The job itself runs `ftl launch` on every node
(see slurm/ftl.sbatch): requeue, exact resume and the rendezvous are its business.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.cli.validate import add_recipe_arguments
from launcher.errors import Problem, UserError
from launcher.recipe.schema import Recipe, SlurmCfg, dump

# flag -> SlurmCfg field; None values are "not given"
FLAGS = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time",
    "constraint": "constraint",
    "mem": "mem",
    "exclusive": "exclusive",
    "cpus_per_task": "cpus_per_task",
    "job_name": "job_name",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--nodes", type=int, metavar="N", help="nodes (default: slurm.nodes, 1)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        metavar="G",
        help="GPUs per node, one process each; 0 on CPU nodes (default: slurm.gpus_per_node)",
    )
    for name, text in (
        ("partition", "partition"),
        ("account", "account to charge"),
        ("qos", "quality of service"),
        ("time", "time limit of one run of the job, e.g. 04:00:00"),
        ("constraint", "node features, e.g. a100"),
        ("mem", "memory per node, e.g. 200G"),
        ("job-name", "job name (default: ftl-<run folder>)"),
    ):
        p.add_argument(f"--{name}", metavar=name.split("-")[0].upper(), help=text)
    p.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs for each node's task")
    p.add_argument(
        "--exclusive", action="store_true", default=None, help="whole nodes, shared with no job"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the batch script; write and submit nothing"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="the run folder holds a run: continue it from its newest complete checkpoint",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="the run folder holds a run: start it over"
    )


def _slurm_settings(recipe: Recipe, args: argparse.Namespace) -> SlurmCfg:
    given = {field: getattr(args, flag) for flag, field in FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    base = recipe.slurm.model_dump() if recipe.slurm else {}
    try:
        return SlurmCfg.model_validate({**base, **given})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            key = f"--{field.replace('_', '-')}" if field in given else f"slurm.{field}"
            problems.append(Problem(err["msg"], key=key, hint="fix the value"))
        raise UserError(problems) from None


def _processes_per_node(recipe: Recipe, s: SlurmCfg) -> int:
    wanted = recipe.distributed.num_processes
    if s.gpus_per_node == 0:
        return wanted if isinstance(wanted, int) else 1
    if isinstance(wanted, int) and wanted != s.gpus_per_node:
        raise UserError(
            Problem(
                f"the recipe runs {wanted} process(es) per node (distributed.num_processes) "
                f"but the job asks for {s.gpus_per_node} GPU(s) per node",
                key="--gpus-per-node",
                hint="make them equal, or set distributed.num_processes: auto (one per GPU)",
            )
        )
    return s.gpus_per_node


def _check(recipe: Recipe, s: SlurmCfg, per_node: int) -> list[Problem]:
    from launcher.recipe.redact import SECRET

    problems = []
    world = per_node * s.nodes
    if world > 1 and recipe.distributed.strategy == "none":
        problems.append(
            Problem(
                f"{s.nodes} node(s) x {per_node} process(es) need a distributed strategy, "
                "but distributed.strategy is none",
                key="distributed.strategy",
                hint="add -o distributed.strategy=ddp (or zero2, zero3, fsdp)",
            )
        )
    if s.retries_on_failure and not s.requeue:
        problems.append(
            Problem(
                "retries need a requeueable job, but slurm.requeue is false",
                key="slurm.retries_on_failure",
                hint="set slurm.requeue: true, or retries_on_failure: 0",
            )
        )
    for name in s.env:
        if SECRET.search(name):
            problems.append(
                Problem(
                    "looks like a secret: the batch script in the run folder would hold it",
                    key=f"slurm.env.{name}",
                    hint="export it in the shell you submit from instead: sbatch passes your "
                    "environment on to the job",
                )
            )
    return problems


def _run_dir(recipe: Recipe) -> Path:
    run_dir = Path(recipe.output.dir).expanduser()
    if not run_dir.is_absolute():
        run_dir = Path.cwd() / run_dir
    text = str(run_dir) + str(Path.cwd())
    if any(not c.isprintable() for c in text):
        raise UserError(
            Problem(
                "the run folder (or the current folder) holds a line break or another "
                "control character, which a batch script cannot carry",
                key="output.dir",
                hint="pick a folder name without control characters",
            )
        )
    return Path(os.path.normpath(run_dir))


def _job_recipe(recipe: Recipe, run_dir: Path, s: SlurmCfg, per_node: int) -> Recipe:
    data = dump(recipe)
    data["output"]["dir"] = str(run_dir)
    data["distributed"]["num_machines"] = s.nodes
    data["distributed"]["num_processes"] = per_node
    data["slurm"] = s.model_dump(mode="json")
    return Recipe.model_validate(data)


def _check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    from launcher.dist import slurm
    from launcher.train import checkpoint, rundir

    if resume and overwrite:
        raise UserError(
            Problem(
                "--resume and --overwrite exclude each other",
                key="--overwrite",
                hint="--resume continues the run in the folder, --overwrite starts it over",
            )
        )
    for job in slurm.read_record(run_dir).get("jobs", [])[-1:]:
        state = slurm.job_state(job["job_id"]) if shutil.which("squeue") else None
        if state and state["state"] in slurm.ACTIVE:
            raise UserError(
                Problem(
                    f"job {job['job_id']} is {state['state']} on this run folder",
                    key="output.dir",
                    hint=f"wait for it, or `scancel {job['job_id']}` first; two jobs on "
                    "one folder would overwrite each other's checkpoints",
                )
            )
    if not rundir.holds_run(run_dir):
        return
    if resume:
        if not checkpoint.complete_checkpoints(run_dir):
            raise UserError(
                Problem(
                    f"{run_dir} holds a run but no complete checkpoint to resume from",
                    key="--resume",
                    hint="--overwrite starts it over; set train.save_every to get checkpoints",
                )
            )
        return
    if not overwrite:
        raise UserError(
            Problem(
                f"{run_dir} already holds a run",
                key="output.dir",
                hint="add --resume to continue it in a new job, --overwrite to start over, "
                "or pick another folder with -o output.dir=...",
            )
        )


class _Written:
    """Files and folders this command created, removed again if the submission fails."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def mkdir(self, path: Path) -> None:
        missing = []
        for p in (path, *path.parents):
            if p.exists():
                break
            missing.append(p)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".ftl-write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            self.undo()
            raise UserError(
                Problem(
                    f"cannot write the run folder {path}: {e.strerror or e}",
                    key="output.dir",
                    hint="pick a folder you can write, e.g. -o output.dir=$HOME/runs/NAME "
                    "(on a filesystem every node sees)",
                )
            ) from None
        self.paths += reversed(missing)

    def write(self, path: Path, text: str, mode: int | None = None) -> None:
        existed = path.exists()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
        if not existed:
            self.paths.append(path)

    def undo(self) -> None:
        for p in reversed(self.paths):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self.paths.clear()


def run(args: argparse.Namespace) -> int:
    from launcher.dist import slurm
    from launcher.recipe import load_recipe
    from launcher.recipe.redact import redact
    from launcher.train import rundir

    for flag in ("nodes", "cpus_per_task"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(
                Problem(f"must be at least 1, got {value}", key="--" + flag.replace("_", "-"))
            )
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        raise UserError(
            Problem(f"must be 0 or more, got {args.gpus_per_node}", key="--gpus-per-node")
        )
    recipe = load_recipe(args.recipe, args.override)
    s = _slurm_settings(recipe, args)
    per_node = _processes_per_node(recipe, s)
    problems = _check(recipe, s, per_node)
    if problems:
        raise UserError(problems)
    run_dir = _run_dir(recipe)
    job_recipe = _job_recipe(recipe, run_dir, s, per_node)
    job = slurm.Job(
        run_dir=run_dir,
        recipe_file=run_dir / "recipe.yaml",
        workdir=Path.cwd(),
        python=sys.executable,
        slurm=s,
        processes_per_node=per_node,
        strategy=recipe.distributed.strategy,
        source=str(args.recipe),
    )
    script = slurm.render(job)
    if args.dry_run:
        print(f"# ftl slurm --dry-run: would write {job.recipe_file} and {job.script}")
        print(script, end="")
        return 0

    slurm.require_sbatch()
    _check_run_folder(run_dir, args.resume, args.overwrite)
    recipe_text = yaml.safe_dump(redact(dump(job_recipe)), sort_keys=False)
    written = _Written()
    written.mkdir(run_dir / slurm.LOGS)
    try:
        written.write(job.recipe_file, recipe_text)
        written.write(job.script, script, mode=0o755)
        job_id = slurm.submit(job.script, job.workdir, hold=True)
    except BaseException:
        written.undo()
        raise
    # the job is held: the folder is put in order before it can start
    if args.overwrite:
        for name in rundir.TRAINED + ("distributed.json",):
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    entry: dict[str, Any] = {
        "job_id": job_id,
        "script": str(job.script),
        "nodes": s.nodes,
        "processes_per_node": per_node,
        "log": str(run_dir / slurm.LOGS / f"slurm-{job_id}.out"),
    }
    slurm.add_to_record(run_dir, entry)
    slurm.release(job_id)
    print(
        f"ftl slurm: submitted job {job_id}: {s.nodes} node(s) x {per_node} process(es), "
        f"{recipe.distributed.strategy}\n"
        f"  script  {job.script}\n"
        f"  recipe  {job.recipe_file}\n"
        f"  log     {entry['log']}\n"
        f"  status  ftl status {shlex_quote(str(run_dir))}"
    )
    return 0


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
