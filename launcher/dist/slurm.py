"""SLURM: render the batch script from `slurm/ftl.sbatch`, submit it, ask how the job is.

`render` is pure: the script is a function of the job description, and every value that
reaches it is shell-quoted (`#SBATCH` lines take shell quoting too). `submit`, `release`
and `job_state` run SLURM's own commands with argument lists, never through a shell.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.assets import data_path
from launcher.errors import Problem, UserError
from launcher.recipe.schema import SlurmCfg

TEMPLATE = "ftl.sbatch"
SCRIPT = "job.sbatch"  # in the run folder, next to recipe.yaml
LOGS = "logs"
RECORD = "slurm.json"
DEFAULT_PORT = "$((20000 + SLURM_JOB_ID % 20000))"  # one port per job: jobs can share nodes


@dataclass(frozen=True)
class Job:
    """Everything the batch script is made of."""

    run_dir: Path  # absolute
    recipe_file: Path  # absolute: the resolved recipe the job runs
    workdir: Path  # absolute: where relative recipe paths resolve (the submit directory)
    python: str  # the interpreter that runs `ftl` on every node
    slurm: SlurmCfg
    processes_per_node: int
    strategy: str
    source: str  # the recipe the user gave, for the script's title

    @property
    def script(self) -> Path:
        return self.run_dir / SCRIPT

    @property
    def job_name(self) -> str:
        return self.slurm.job_name or f"ftl-{self.run_dir.name}"


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def directives(job: Job) -> list[str]:
    """The `#SBATCH` lines, each value shell-quoted (sbatch strips the quotes)."""
    s, q = job.slurm, shlex.quote
    opts = [
        f"--job-name={q(job.job_name)}",
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1",
    ]
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.cpus_per_task:
        opts.append(f"--cpus-per-task={s.cpus_per_task}")
    for name in ("partition", "account", "qos", "constraint", "mem"):
        value = getattr(s, name)
        if value:
            opts.append(f"--{name}={q(value)}")
    if s.exclusive:
        opts.append("--exclusive")
    opts += [
        f"--time={q(s.time)}",
        f"--signal=B:USR1@{s.signal_grace_s}",
        "--requeue" if s.requeue else "--no-requeue",
        "--open-mode=append",  # a requeued run appends to the log instead of truncating it
        f"--output={q(str(job.run_dir / LOGS / 'slurm-%j.out'))}",
        f"--chdir={q(str(job.workdir))}",
    ]
    for arg in s.sbatch_args:
        name, eq, value = arg.partition("=")
        opts.append(f"{name}={q(value)}" if eq else name)
    return [f"#SBATCH {o}" for o in opts]


def render(job: Job) -> str:
    """The batch script for `job`."""
    s, q = job.slurm, shlex.quote
    exports = "".join(f"export {name}={q(value)}\n" for name, value in s.env.items())
    fields = {
        "TITLE": _one_line(
            f"ftl {__version__}: {job.source} -> {job.run_dir}, {s.nodes} node(s) x "
            f"{job.processes_per_node} process(es), {job.strategy}"
        ),
        "SCRIPT": q(str(job.script)),
        "DIRECTIVES": "\n".join(directives(job)),
        "RUN_DIR": q(str(job.run_dir)),
        "RECIPE": q(str(job.recipe_file)),
        "FTL": f"{q(job.python)} -m launcher.cli.main",
        "REQUEUE": "1" if s.requeue else "0",
        "RETRIES": str(s.retries_on_failure),
        "EXPORTS": exports,
        "PORT": str(s.port) if s.port else DEFAULT_PORT,
    }
    text = data_path("slurm", TEMPLATE).read_text()
    for key, value in fields.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:  # a placeholder the template gained but this function does not fill
        raise RuntimeError(f"unfilled placeholder in slurm/{TEMPLATE}")
    return text


# -- running SLURM's commands ------------------------------------------------------------
def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UserError(
            Problem(
                "sbatch is not on PATH: this machine cannot submit SLURM jobs",
                key="sbatch",
                hint="run ftl slurm on the cluster's login node, or add --dry-run to print "
                "the batch script without submitting it",
            )
        )


def submit(script: Path, workdir: Path, *, hold: bool) -> str:
    """sbatch the script; its job id. UserError with sbatch's own message if refused."""
    argv = ["sbatch", "--parsable", *(["--hold"] if hold else []), str(script)]
    try:
        done = _run(argv, cwd=workdir)
    except FileNotFoundError:
        require_sbatch()
        raise
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise UserError(
            Problem(
                f"sbatch refused the job: {said}",
                key="sbatch",
                hint="fix the option sbatch names (slurm.* in the recipe, or the ftl slurm "
                "flag); `sinfo` lists partitions, `sacctmgr show assoc` accounts and QOS",
            )
        )
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(Problem(f"sbatch printed {done.stdout.strip()!r}, not a job id"))
    return job_id


def release(job_id: str) -> None:
    done = _run(["scontrol", "release", job_id])
    if done.returncode != 0:
        _run(["scancel", job_id])
        raise UserError(
            Problem(
                f"could not release held job {job_id}: {done.stderr.strip()}",
                key="sbatch",
                hint="the job was cancelled; submit again",
            )
        )


def job_state(job_id: str) -> dict[str, Any] | None:
    """{"state", "reason", "nodes"} from squeue, else scontrol; None when SLURM forgot it."""
    if shutil.which("squeue"):
        done = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%N"])
        line = done.stdout.strip() if done.returncode == 0 else ""
        if line:
            state, reason, nodes = (line.split("|") + ["", ""])[:3]
            return {"state": state, "reason": reason, "nodes": nodes}
    if shutil.which("scontrol"):
        done = _run(["scontrol", "show", "job", "-o", job_id])
        if done.returncode == 0 and "JobState=" in done.stdout:
            fields = dict(
                part.split("=", 1) for part in done.stdout.split() if "=" in part
            )
            return {
                "state": fields.get("JobState", "?"),
                "reason": fields.get("Reason", ""),
                "nodes": fields.get("NodeList", ""),
                "exit_code": fields.get("ExitCode"),
                "restarts": fields.get("Restarts"),
            }
    return None


ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


# -- the run folder's record of its jobs --------------------------------------------------
def read_record(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {"jobs": []}


def add_to_record(run_dir: Path, entry: dict[str, Any]) -> None:
    record = read_record(run_dir)
    record.setdefault("jobs", []).append({**entry, "submitted": round(time.time(), 3)})
    tmp = run_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / RECORD)
