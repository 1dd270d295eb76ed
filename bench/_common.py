"""Shared by the tool benchmarks: run one side in a fresh process, read two outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# printed last by each side: the peak RSS of its own address space, KiB (ru_maxrss would
# carry the parent's peak over fork and exec)
PRINT_VMHWM = 'print(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))'


def side(code: str, *args: str) -> tuple[float, float]:
    """Run `code` in a fresh interpreter; (wall seconds, peak RSS MiB)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return wall, int(done.stdout.strip().splitlines()[-1]) / 1024


def index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `folder` that holds it."""
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            found.update(dict.fromkeys(st.keys(), f))  # noqa: SIM118
    return found


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest absolute difference over every tensor of two folders (inf if names differ)."""
    from safetensors import safe_open

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return float("inf")
    worst = 0.0
    for key, fa in ia.items():
        with safe_open(str(fa), "pt") as sa, safe_open(str(ib[key]), "pt") as sb:
            x, y = sa.get_tensor(key).float(), sb.get_tensor(key).float()
            worst = max(worst, float((x - y).abs().max()))
    return worst


def step_clock():
    """A `TrainerCallback` that records when training starts, when each step ends and every
    logged loss (Trainer- and TRL-side benchmarks time steps the same way)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.step_end: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Clock()
