"""`ftl status RUN_DIR [--json]`: where a run stands.

The SLURM job (id and state, when `ftl slurm` submitted it), the last step logged, the
newest complete checkpoint, how often the run started and was requeued, and its last
summary. Reads only what the run folder holds (and asks SLURM about the job).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder (output.dir of the recipe)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def status(run_dir: Path) -> dict[str, Any]:
    from launcher.dist import slurm
    from launcher.train import checkpoint, report

    if not run_dir.is_dir():
        raise UserError(
            Problem(f"{run_dir} is not a folder", key="RUN_DIR", hint="pass a run's output.dir")
        )
    metrics = (
        report.read_metrics(run_dir / report.METRICS)
        if (run_dir / report.METRICS).is_file()
        else []
    )
    starts = [r for r in metrics if r.get("kind") == "start"]
    trains = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    ckpts = checkpoint.complete_checkpoints(run_dir)
    summary = None
    if (run_dir / report.SUMMARY).is_file():
        try:
            summary = json.loads((run_dir / report.SUMMARY).read_text())
        except ValueError:
            summary = None
    jobs = slurm.read_record(run_dir).get("jobs", [])
    job = None
    if jobs:
        last = jobs[-1]
        job = {"id": last["job_id"], "log": last.get("log"), "submissions": len(jobs)}
        state = slurm.job_state(last["job_id"])
        job.update(state or {"state": "UNKNOWN", "reason": "SLURM no longer knows the job"})
    if not metrics and not summary and not jobs and not ckpts:
        raise UserError(
            Problem(
                f"{run_dir} holds no run",
                key="RUN_DIR",
                hint="pass the output.dir of a run started by ftl train, launch or slurm",
            )
        )
    total = (summary or {}).get("total_steps") or (
        starts[-1].get("total_steps") if starts else None
    )
    return {
        "run_dir": str(run_dir),
        "job": job,
        "last_step": max((r["step"] for r in trains), default=0),
        "total_steps": total,
        "last_loss": trains[-1]["loss"] if trains else None,
        "last_eval": {k: v for k, v in evals[-1].items() if k != "kind"} if evals else None,
        "checkpoint": str(ckpts[-1]) if ckpts else None,
        "checkpoint_step": checkpoint.step_of(ckpts[-1]) if ckpts else None,
        "starts": len(starts),
        "restarts": max((r.get("restart", 0) for r in starts), default=0),
        "summary": (
            {k: summary.get(k) for k in ("status", "steps", "final_train_loss", "model_dir")}
            if summary
            else None
        ),
    }


def run(args: argparse.Namespace) -> int:
    info = status(Path(args.run_dir))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    job = info["job"]
    lines = [f"run         {info['run_dir']}"]
    if job:
        where = f" on {job['nodes']}" if job.get("nodes") else ""
        why = f" ({job['reason']})" if job.get("reason") not in (None, "", "None") else ""
        lines.append(f"job         {job['id']} {job['state']}{where}{why}")
        if job.get("log"):
            lines.append(f"log         {job['log']}")
    total = f"/{info['total_steps']}" if info["total_steps"] else ""
    loss = f", loss {info['last_loss']:.4f}" if info["last_loss"] is not None else ""
    lines.append(f"step        {info['last_step']}{total}{loss}")
    lines.append(
        f"checkpoint  {info['checkpoint']} (step {info['checkpoint_step']})"
        if info["checkpoint"]
        else "checkpoint  none complete"
    )
    lines.append(f"starts      {info['starts']} (SLURM restarts: {info['restarts']})")
    if info["summary"]:
        s = info["summary"]
        lines.append(f"last stop   {s['status']} at step {s['steps']}")
    print("\n".join(lines))
    return 0
