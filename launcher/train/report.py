"""What a run shows and leaves behind: progress bar, metrics.jsonl, summary.json, loss.png."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOT = "loss.png"


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the resumed step are dropped."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if enabled and resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a line cut short by a killed process is dropped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and of the GPU when there is one."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def rss_now_mb() -> float:
    """Resident memory of this process right now (Linux; 0 where unknown)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = run_dir / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, run_dir / SUMMARY)


def plot(run_dir: Path, records: list[dict[str, Any]]) -> Path | None:
    """Train and eval loss curves (and accuracy when the task has it) to loss.png."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            label="eval loss",
            color="tab:orange",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evals and "accuracy" in evals[0]:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in evals],
            [r["accuracy"] for r in evals],
            "s--",
            color="tab:green",
            label="eval accuracy",
        )
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = run_dir / PLOT
    fig.savefig(out)
    plt.close(fig)
    return out


def progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0,
    )


def start_record(step: int, total_steps: int, world: int, resumed_from: Any) -> dict[str, Any]:
    """One line per start of the run (first start, resume, SLURM requeue) in metrics."""
    import time

    env = os.environ
    return {
        "kind": "start",
        "step": step,
        "total_steps": total_steps,
        "time": round(time.time(), 3),
        "world_size": world,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def summary(
    records: list[dict[str, Any]],
    *,
    status: str,
    recipe: Any,
    state: Any,
    sched: Any,
    restored: dict[str, Any] | None,
    run_dir: Path,
    **facts: Any,
) -> dict[str, Any]:
    """summary.json: how the run ended, what it trained and saw, how fast, on what.

    `final_eval` describes the saved model (the restored best one, or the last eval);
    `facts` are passed through (times, throughput, parameters, data, memory...)."""
    train_recs = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last = evals[-1] if evals else None
    final = last
    if restored is not None:
        final = next((r for r in evals if r["step"] == restored["step"]), last)
    es = recipe.train.early_stopping
    starts = [r for r in records if r.get("kind") == "start"]
    model_dir = run_dir / "model"
    out = {
        "status": status,
        "task": recipe.task,
        "steps": state.step,
        "total_steps": sched.total_steps,
        "epochs": round(state.step / sched.steps_per_epoch, 4),
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        "final_eval": {k: v for k, v in (final or {}).items() if k != "kind"} or None,
        "last_eval": {k: v for k, v in (last or {}).items() if k != "kind"} or None,
        "best": (
            {
                "metric": es.metric,
                "value": state.best.value,
                "step": state.best.step,
                "model_is_best": restored is not None,
            }
            if es is not None
            else None
        ),
        "tokens_seen": state.tokens,
        "samples_seen": state.samples,
        "schedule": sched.as_dict(),
        "starts": len(starts),
        "restarts": max((r.get("restart", 0) for r in starts), default=0),
        "model_dir": str(model_dir) if model_dir.exists() else None,
    }
    return {**out, **facts, **peak_memory_mb()}


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys with scalar values (what trackers take as a config)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def train_record(
    step: int,
    epoch: float,
    window: Any,
    lr: float,
    grad_norm: float | None,
    tokens: int,
    samples: int,
    seconds: float,
) -> dict[str, Any]:
    """One train line of metrics.jsonl: the log window's mean loss and objective
    statistics, and the rates of the tokens and samples all ranks trained on in it."""
    dt = max(seconds, 1e-9)
    return {
        "kind": "train",
        "step": step,
        "epoch": round(epoch, 4),
        "loss": window.loss / window.steps,
        **{k: v / window.steps for k, v in window.stats.items()},  # the objective's stats
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / dt,
        "samples_per_s": samples / dt,
        # what the rates are made of (a packed step holds many examples per row)
        "tokens": tokens,
        "samples": samples,
        "seconds": round(dt, 4),
    }
