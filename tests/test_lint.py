"""ruff (configured in pyproject.toml) keeps the code base clean; CI runs it through pytest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["launcher", "tests", "bench", "tools"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        pytest.skip("ruff not installed (pip install -e '.[dev]')")
    return subprocess.run([exe, *args, *TARGETS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    proc = ruff("check")
    assert proc.returncode == 0, proc.stdout


def test_ruff_format():
    proc = ruff("format", "--check")
    assert proc.returncode == 0, proc.stdout
