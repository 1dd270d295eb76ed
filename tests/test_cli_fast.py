"""The CLI starts fast: `ftl --help` and `ftl validate` never import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys, time
t = time.perf_counter()
from launcher.cli.main import main
rc = main({argv!r})
heavy = sorted(m for m in ("torch", "transformers", "accelerate", "deepspeed", "peft") if m in sys.modules)
print("HEAVY", heavy, "RC", rc, "T", time.perf_counter() - t)
"""


def run(argv: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", CHECK.format(argv=argv)], cwd=ROOT, capture_output=True, text=True
    )
    return proc.stdout


def test_help_imports_nothing_heavy():
    out = run([])  # no verb: prints the help
    assert "HEAVY []" in out, out


def test_validate_imports_nothing_heavy():
    out = run(["validate", "recipes/quickstart.yaml"])
    assert "HEAVY [] RC 0" in out, out


def test_env_names_the_cpu_features_and_versions_without_importing_libraries():
    import json
    from importlib.metadata import version

    out = run(["env", "--no-torch"])
    assert "HEAVY [] RC 0" in out, out
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli.main", "env", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    facts = json.loads(proc.stdout)
    assert facts["packages"]["transformers"] == version("transformers")
    assert facts["cpu"]["cores"] >= 1 and facts["cpu"]["model"]
    flags = Path("/proc/cpuinfo").read_text().split()
    assert ("avx512_bf16" in flags) is ("avx512_bf16" in facts["cpu"]["flags"])
    assert isinstance(facts["torch"]["gpus"], list)
