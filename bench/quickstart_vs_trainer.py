"""ftl vs HF Trainer on the quickstart work, side by side in one run.

    python bench/quickstart_vs_trainer.py [--pairs 1]

Each pair runs `ftl train recipes/quickstart.yaml` and bench/trainer_quickstart.py (the
same model, split, batch 16, length 128, 112 steps, evals at 50 and 100 plus a final
one, fp32, seeded before the head is built) as fresh processes, alternating which goes
first, and times each whole process (imports, data, model load, training, evals, save).
Prints a Markdown table and the wall-time ratio ftl / Trainer; figures go to
docs/benchmarks.md. Run it on an otherwise idle machine: both sides use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> tuple[float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def run_ftl(out: Path) -> dict:
    wall, _ = _run(
        [
            sys.executable,
            "-m",
            "launcher.cli.main",
            "train",
            "recipes/quickstart.yaml",
            "-o",
            f"output.dir={out}",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": wall,
        "accuracy": summary["final_eval"]["accuracy"],
        "eval_loss": summary["final_eval"]["eval_loss"],
        "steps": summary["steps"],
    }


def run_trainer() -> dict:
    wall, out = _run([sys.executable, "bench/trainer_quickstart.py"])
    result = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": wall, **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = ["ftl", "trainer"] if i % 2 == 0 else ["trainer", "ftl"]
            for who in order:
                r = run_ftl(Path(tmp) / f"ftl-{i}") if who == "ftl" else run_trainer()
                r["who"] = who
                rows.append(r)
                print(json.dumps(r), flush=True)
    ftl = [r for r in rows if r["who"] == "ftl"]
    hf = [r for r in rows if r["who"] == "trainer"]
    ratio = statistics.median(r["wall_s"] for r in ftl) / statistics.median(r["wall_s"] for r in hf)
    print("\n| run | wall time (s) | eval accuracy | eval loss | steps |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['who']} | {r['wall_s']:.1f} | {r['accuracy']:.4f} | {r['eval_loss']:.4f} | {r['steps']} |"
        )
    print(f"\nwall-time ratio ftl / Trainer (medians): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
