"""`ftl env`: the machine and the library versions, for a bug report or a red CI.

Libraries take different paths by CPU (bitsandbytes, oneDNN and DeepSpeed's CPU ops
branch on AVX512-BF16 and AMX) and by version, so a failure report starts with these.
Versions are read from package metadata, not by importing the packages; only torch is
imported, for its build and the GPUs it sees (`--no-torch` skips that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# the libraries ftl's behaviour depends on, in the order a reader looks for them
PACKAGES = (
    "ftl",
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "deepspeed",
    "bitsandbytes",
    "kernels",
    "datasets",
    "tokenizers",
    "safetensors",
    "pydantic",
    "gguf",
    "trl",
)
# CPU features that change which kernels the libraries above run
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")


def cpu() -> dict[str, Any]:
    """Model name, logical cores and the kernel-relevant feature flags of this CPU."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and info["model"] in ("", platform.machine()):
            info["model"] = value.strip()
        elif key in ("flags", "features") and not info["flags"]:
            have = set(value.split())
            info["flags"] = [f for f in CPU_FLAGS if f in have]
    info["cores"] = os.cpu_count()
    return info


def versions() -> dict[str, str]:
    """Installed version of each of PACKAGES ("absent" when not installed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def torch_facts() -> dict[str, Any]:
    """torch's CUDA build and the GPUs it sees."""
    import torch

    facts: dict[str, Any] = {"cuda_build": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts["gpus"].append(
                f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
            )
    facts["threads"] = torch.get_num_threads()
    return facts


def report(with_torch: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu(),
        "packages": versions(),
    }
    if with_torch and out["packages"]["torch"] != "absent":
        out["torch"] = torch_facts()
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-torch", action="store_true", help="do not import torch (no GPU lines)")


def run(args: argparse.Namespace) -> int:
    facts = report(with_torch=not args.no_torch)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    c = facts["cpu"]
    print(f"python       {facts['python']} on {facts['platform']}")
    print(f"cpu          {c['model']}, {c['cores']} logical cores")
    print(f"cpu features {' '.join(c['flags']) or '-'}")
    if "torch" in facts:
        t = facts["torch"]
        print(f"torch build  cuda {t['cuda_build'] or '- (CPU build)'}, {t['threads']} threads")
        print(f"gpus         {'; '.join(t['gpus']) or '-'}")
    for name, v in facts["packages"].items():
        print(f"{name:<12} {v}")
    return 0
