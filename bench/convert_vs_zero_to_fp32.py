#!/usr/bin/env python3
"""`ftl convert zero` against DeepSpeed's own `zero_to_fp32.py`, same run, same checkpoint.

A ~300M-parameter Llama (random weights) is trained for one step with ZeRO-3 on 2 CPU
ranks by `ftl launch`; its checkpoint is converted to safetensors by both tools, each in
a fresh process (peak RSS = that process's VmHWM; wall time = the whole process). The
outputs are compared tensor by tensor (they must be bit-identical).

    python bench/convert_vs_zero_to_fp32.py     # ~5 minutes on 2 cores, ~5 GB of disk

Prints a table and writes .cache/bench/convert/result.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from _common import PRINT_VMHWM, max_abs_diff, side

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "bench" / "convert"
SIZES = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
)

DS_SIDE = f"""
import re, runpy, sys
script, ckpt, out = sys.argv[1:4]
sys.argv = [script, ckpt, out, "--safe_serialization"]
runpy.run_path(script, run_name="__main__")
{PRINT_VMHWM}
"""

FTL_SIDE = f"""
import re, sys
from launcher.cli.main import standalone
ckpt, out = sys.argv[1:3]
assert standalone("convert", ["zero", ckpt, "--out", out]) == 0
{PRINT_VMHWM}
"""


def make_checkpoint() -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "assets"))
    import make_tiny

    base, data, run = WORK / "llama", WORK / "train.jsonl", WORK / "run"
    if not (base / "config.json").is_file():
        params = make_tiny.make_llama(base, **SIZES)
        print(f"model: {params / 1e6:.0f}M parameters", flush=True)
    make_tiny.write_jsonl(data, make_tiny.chat_rows(16, seed=0))
    recipe = WORK / "recipe.yaml"
    recipe.write_text(
        f"""\
model: {{name_or_path: {base}}}
data: {{format: chat, train: {data}, max_length: 64}}
train: {{max_steps: 1, micro_batch_size: 2, lr: 1.0e-4, save_every: 1, log_every: 1}}
distributed: {{strategy: zero3}}
output: {{dir: {run}, save_model: false}}
"""
    )
    ckpt = run / "checkpoints" / "step-00000001"
    if not (ckpt / "COMPLETE").is_file():
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "launcher.cli.main",
                "launch",
                str(recipe),
                "--num-processes",
                "2",
            ],
            check=True,
        )
    return ckpt


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint()
    for out in ("out-ds", "out-ftl"):
        shutil.rmtree(WORK / out, ignore_errors=True)
    ds_wall, ds_rss = side(DS_SIDE, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(WORK / "out-ds"))
    ftl_wall, ftl_rss = side(FTL_SIDE, str(ckpt), str(WORK / "out-ftl"))
    same = max_abs_diff(WORK / "out-ftl", WORK / "out-ds") == 0.0
    result = {
        "model": "Llama ~300M (random weights), ZeRO-3 checkpoint of 2 CPU ranks",
        "ftl": {"wall_s": round(ftl_wall, 1), "peak_rss_mib": round(ftl_rss)},
        "zero_to_fp32": {"wall_s": round(ds_wall, 1), "peak_rss_mib": round(ds_rss)},
        "rss_ratio": round(ftl_rss / ds_rss, 3),
        "time_ratio": round(ftl_wall / ds_wall, 3),
        "bit_identical": same,
    }
    (WORK / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| side | wall s | peak RSS MiB |\n| --- | --- | --- |")
    print(f"| ftl convert zero | {ftl_wall:.1f} | {ftl_rss:.0f} |")
    print(f"| DeepSpeed zero_to_fp32.py | {ds_wall:.1f} | {ds_rss:.0f} |")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
