"""One command for a lent GPU: LoRA, QLoRA nf4 and 8-bit LoRA steps on CUDA in bf16.

    python bench/gpu_check.py                 # ~1.1B Llama, random weights: 2-4 minutes
    python bench/gpu_check.py --tiny --cpu    # the same path on a tiny model (CI smoke test)

Builds a Llama from a config (no download), writes a tiny chat set, and runs `ftl train`
in a fresh process per mode, so each mode's peak GPU memory is its own. Reports
tokens/s, peak GPU memory, the first and last loss and whether the loss fell, as a table
and as JSON (to --out, or $OUT/gpu_check.json when $OUT is set). Exits 1 if a mode fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "assets"))

MODES = {
    "lora": ["adapter.type=lora"],
    "qlora_nf4": ["adapter.type=lora", "quant.bits=4", "quant.type=nf4"],
    "lora_8bit": ["adapter.type=lora", "quant.bits=8"],
    "qdora_nf4": ["adapter.type=dora", "quant.bits=4"],
}
# ~1.1B parameters (TinyLlama's shape with a 32K vocabulary)
BIG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


def write_inputs(work: Path, tiny: bool, seq: int, rows: int) -> Path:
    import make_tiny

    model = work / "model"
    params = make_tiny.make_llama(model, **({} if tiny else BIG))
    print(f"model: {params / 1e6:.1f}M parameters in {model}", flush=True)
    data = make_tiny.write_jsonl(work / "train.jsonl", make_tiny.chat_rows(rows, seed=0))
    recipe = work / "recipe.yaml"
    recipe.write_text(
        f"""\
task: causal_lm
model:
  name_or_path: {model}
  dtype: bfloat16
  gradient_checkpointing: true
data: {{format: chat, train: {data}, max_length: {seq}}}
adapter: {{type: lora, r: 16, alpha: 32, dropout: 0.05}}
quant: {{compute_dtype: bfloat16}}
train:
  micro_batch_size: 8
  lr: 2.0e-4
  log_every: 1
  precision: bf16
output: {{dir: {work / "runs" / "unused"}}}
"""
    )
    return recipe


def run_mode(recipe: Path, name: str, overrides: list[str], steps: int, cpu: bool) -> dict:
    out = recipe.parent / "runs" / name
    args = [sys.executable, "-m", "launcher.cli.main", "train", str(recipe)]
    for o in [*overrides, f"train.max_steps={steps}", f"output.dir={out}"]:
        args += ["-o", o]
    if cpu:  # bf16 4-bit compute is slow on CPU; fp32 keeps the smoke test short
        args += ["-o", "train.precision=fp32", "-o", "quant.compute_dtype=float32"]
        args += ["-o", "model.dtype=float32"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else dict(os.environ)
    t0 = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    row: dict = {"mode": name, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout)[-3000:]
        return row
    summary = json.loads((out / "summary.json").read_text())
    losses = [
        json.loads(x)["loss"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    row.update(
        tokens_per_s=summary.get("tokens_per_s"),
        peak_gpu_mb=summary.get("peak_gpu_mb"),
        peak_rss_mb=summary.get("peak_rss_mb"),
        trainable=summary.get("trainable_parameters"),
        parameters=summary.get("parameters"),
        first_loss=losses[0],
        last_loss=losses[-1],
        learned=losses[-1] < losses[0],
    )
    return row


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (smoke test without a GPU)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per mode")
    ap.add_argument("--seq", type=int, default=None, help="max sequence length")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    steps = args.steps or (4 if args.tiny else 30)
    seq = args.seq or (64 if args.tiny else 512)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU here: use --cpu for the smoke test", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftl-gpu-check-") as tmp:
        recipe = write_inputs(Path(tmp), args.tiny, seq, rows=64 if args.tiny else 512)
        for name in args.modes.split(","):
            row = run_mode(recipe, name, MODES[name], steps, args.cpu)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\ndevice: {device}; {steps} steps of 8 x <= {seq} tokens, bf16, grad checkpointing\n")
    print("| mode | tokens/s | peak GPU MB | peak RSS MB | loss first -> last | ok |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["rc"]:
            print(f"| {r['mode']} | - | - | - | - | FAILED (rc {r['rc']}) |")
            continue
        print(
            f"| {r['mode']} | {r['tokens_per_s']:.0f} | {_mb(r['peak_gpu_mb'])} "
            f"| {_mb(r['peak_rss_mb'])} "
            f"| {r['first_loss']:.3f} -> {r['last_loss']:.3f} | {'yes' if r['learned'] else 'NO'} |"
        )
    result = {
        "device": device,
        "steps": steps,
        "seq": seq,
        "torch": torch.__version__,
        "rows": rows,
    }
    out = args.out or (
        Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    )
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return 1 if any(r["rc"] or not r.get("learned") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
