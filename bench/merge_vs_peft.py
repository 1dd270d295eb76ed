#!/usr/bin/env python3
"""Streaming `ftl merge` against PEFT `merge_and_unload` + `save_pretrained`, same run.

A ~1.1B-parameter Llama (TinyLlama-1.1B shapes, random weights, bf16, saved in >= 4
safetensors shards) and a rank-16 LoRA on every linear layer of the decoder. Each side
runs in its own fresh process; peak RSS is that process's VmHWM (Python and torch
included; not ru_maxrss, which Linux carries over from the parent across fork and exec),
wall time is the whole process. The outputs are compared tensor by tensor.

    python bench/merge_vs_peft.py            # ~5 minutes on 2 cores, ~7 GB of disk
    python bench/merge_vs_peft.py --keep     # keep .cache/bench/merge (base, adapter)

Prints a table and writes .cache/bench/merge/result.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import PRINT_VMHWM, max_abs_diff, side

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "bench" / "merge"
SHAPES = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


def make_base(out: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="600MB")
    return sum(p.numel() for p in model.parameters())


def make_adapter(base: Path, out: Path) -> None:
    """A rank-16 LoRA with non-zero factors, in PEFT's own format."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    cfg.base_model_name_or_path = str(base)
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(1)
    h, inter = SHAPES["hidden_size"], SHAPES["intermediate_size"]
    kv = h // SHAPES["num_attention_heads"] * SHAPES["num_key_value_heads"]
    dims = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    tensors = {}
    for layer in range(SHAPES["num_hidden_layers"]):
        for name, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=g) * 0.02
    save_file(tensors, str(out / "adapter_model.safetensors"))


PEFT_SIDE = f"""
import re, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="600MB")
{PRINT_VMHWM}
"""

FTL_SIDE = f"""
import re, sys
from launcher.cli.main import standalone
base, adapter, out = sys.argv[1:4]
assert standalone("merge", ["--base", base, "--adapter", adapter, "--out", out]) == 0
{PRINT_VMHWM}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the base and adapter for reruns")
    args = ap.parse_args()
    base, adapter = WORK / "base", WORK / "adapter"
    if not (base / "model.safetensors.index.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        params = make_base(base)
        print(f"base: {params / 1e9:.2f}B parameters", flush=True)
    if not (adapter / "adapter_model.safetensors").is_file():
        make_adapter(base, adapter)
    shards = len(list(base.glob("model-*.safetensors")))
    shutil.rmtree(WORK / "out-peft", ignore_errors=True)
    shutil.rmtree(WORK / "out-ftl", ignore_errors=True)
    peft_wall, peft_rss = side(PEFT_SIDE, str(base), str(adapter), str(WORK / "out-peft"))
    ftl_wall, ftl_rss = side(FTL_SIDE, str(base), str(adapter), str(WORK / "out-ftl"))
    diff = max_abs_diff(WORK / "out-ftl", WORK / "out-peft")
    result = {
        "model": "Llama 1.1B (TinyLlama shapes), random bf16 weights",
        "base_shards": shards,
        "lora": f"r={RANK} on {', '.join(TARGETS)}",
        "ftl": {"wall_s": round(ftl_wall, 1), "peak_rss_mib": round(ftl_rss)},
        "peft": {"wall_s": round(peft_wall, 1), "peak_rss_mib": round(peft_rss)},
        "rss_ratio": round(ftl_rss / peft_rss, 3),
        "time_ratio": round(ftl_wall / peft_wall, 3),
        "max_abs_diff_bf16": diff,
    }
    (WORK / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| side | wall s | peak RSS MiB |\n| --- | --- | --- |")
    print(f"| ftl merge | {ftl_wall:.1f} | {ftl_rss:.0f} |")
    print(f"| PEFT merge_and_unload + save_pretrained | {peft_wall:.1f} | {peft_rss:.0f} |")
    print(json.dumps(result, indent=2))
    for out in ("out-peft", "out-ftl"):
        shutil.rmtree(WORK / out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(adapter, ignore_errors=True)


if __name__ == "__main__":
    main()
