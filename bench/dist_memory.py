"""Per-rank peak memory of a ~100M-parameter Llama on 2 ranks: DDP vs ZeRO-2/3/3+offload.

    .venv/bin/python bench/dist_memory.py [--steps 3] [--out bench-out/dist-memory]

Each strategy is one real `ftl launch --num-processes 2` of the same recipe (CPU, gloo,
fp32, AdamW, micro batch 2 x 128 tokens). Every rank records its peak RSS and its RSS
just before the model was built (imports and data: the same for every strategy), in the
run's summary.json (`memory_per_rank`). The table shows both, and the training memory
(peak minus that baseline), with its ratio to DDP's. Figures go to docs/benchmarks.md.

On a CPU-only host "offload" moves nothing off a device (parameters and optimizer states
are already in host memory); its row shows what DeepSpeedCPUAdam and the offload buffers
cost there. On GPUs compare `peak_gpu_mb`, also in summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "assets"))

STRATEGIES = ["ddp", "zero2", "zero3", "zero3_offload", "zero3:ds-default"]
# ":ds-default": ZeRO-3 with DeepSpeed's own 1e9 for the three sizes it counts in parameters
# (stage3_max_live_parameters, stage3_max_reuse_distance, sub_group_size) instead of ftl's
# model-relative fill (1/7 of the parameters, capped at 1e9: launcher/train/distributed.py).
DS_DEFAULT = 1_000_000_000


def make_model(out: Path) -> int:
    import make_tiny

    return make_tiny.make_llama(
        out,
        vocab_size=16000,  # more rows than the tiny tokenizer uses: a realistic embedding
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="bench-out/dist-memory")
    ap.add_argument("--strategies", nargs="*", default=STRATEGIES)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="train.precision")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import make_tiny

    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        n = make_model(model_dir)
    else:
        from transformers import AutoConfig

        n = None
        AutoConfig.from_pretrained(model_dir)
    data = make_tiny.write_jsonl(out / "train.jsonl", make_tiny.chat_rows(64, seed=0))
    recipe = out / "recipe.yaml"
    recipe.write_text(
        f"""\
task: causal_lm
model: {{name_or_path: {model_dir}}}
data: {{format: chat, train: {data}, max_length: 128}}
train:
  max_steps: {args.steps}
  micro_batch_size: 2
  lr: 1.0e-4
  precision: {args.precision}
  log_every: 1
  fast_dropout: false
output: {{dir: {out / "unused"}, save_model: false}}
"""
    )
    rows = {}
    for name in args.strategies:
        strategy, _, variant = name.partition(":")
        run = out / f"run-{strategy}-{variant or 'shipped'}"
        extra = []
        if variant == "ds-default":
            from launcher.assets import data_path

            cfg = json.loads(data_path("ds_configs", f"{strategy}.json").read_text())
            for key in (
                "stage3_max_live_parameters",
                "stage3_max_reuse_distance",
                "sub_group_size",
            ):
                cfg["zero_optimization"][key] = DS_DEFAULT
            path = out / f"{strategy}-ds-default.json"
            path.write_text(json.dumps(cfg, indent=2))
            extra = ["-o", f"distributed.deepspeed_config={path}"]
        cmd = [
            sys.executable,
            "-m",
            "launcher.cli.main",
            "launch",
            str(recipe),
            "--num-processes",
            "2",
            "--main-process-port",
            str(free_port()),
            "--overwrite",
            "-o",
            f"distributed.strategy={strategy}",
            "-o",
            f"output.dir={run}",
            *extra,
        ]
        t0 = time.time()
        # RSS as a measure of live memory: glibc returns freed blocks at once (ftl's CPU
        # malloc tuning keeps them for speed, which would inflate every peak)
        env = {
            **os.environ,
            "FTL_KEEP_FREED_MEMORY": "0",
            "MALLOC_MMAP_THRESHOLD_": "131072",
            "MALLOC_TRIM_THRESHOLD_": "131072",
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        summary = json.loads((run / "summary.json").read_text())
        ranks = summary["memory_per_rank"]
        rows[name] = {
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "baseline_mb": max(r["rss_before_model_mb"] for r in ranks),
            "training_mb": max(r["peak_rss_mb"] - r["rss_before_model_mb"] for r in ranks),
            "params": summary["parameters"],
            "wall_s": round(time.time() - t0, 1),
            "loss": summary["final_train_loss"],
        }
        print(name, rows[name], flush=True)
    ddp = rows.get("ddp")
    n = n or next(iter(rows.values()))["params"]
    print(f"\n{n / 1e6:.1f}M parameters, 2 ranks, {args.steps} steps, {args.precision}\n")
    print("| strategy | peak RSS per rank (MB) | before model (MB) | training (MB) | vs DDP |")
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        ratio = f"{r['training_mb'] / ddp['training_mb']:.2f}" if ddp else "-"
        print(
            f"| {s} | {r['peak_rss_mb']:.0f} | {r['baseline_mb']:.0f} | "
            f"{r['training_mb']:.0f} | {ratio} |"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
