"""Shared fixtures: tiny models, tokenizers and data, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# the tokenized-data cache of every run in the suite: a fresh folder, not ~/.cache/ftl
os.environ["FTL_CACHE_DIR"] = tempfile.mkdtemp(prefix="ftl-cache-")
# DeepSpeed JIT-compiles two C++ ops on CPU (shared-memory allreduce ~80 s, cpu_adam for
# ZeRO-Offload ~70 s) into torch's extension cache (TORCH_EXTENSIONS_DIR, default
# ~/.cache/torch_extensions). The README's setup command builds them (tools/build_ops.py);
# if they are missing, they are built in the background while other tests run, and
# `deepspeed_ops` waits for them.
sys.path.insert(0, str(Path(__file__).parent / "assets"))

import make_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPS_LOGS = ROOT / ".cache" / "ops-build"
_ops_build: dict[str, subprocess.Popen] = {}

WARM_OPS = """
import sys
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
{"shm": ShareMemCommBuilder, "adam": CPUAdamBuilder}[sys.argv[1]]().load(verbose=False)
"""


def pytest_collection_modifyitems(config, items):
    """Start compiling DeepSpeed's CPU ops as soon as a test that needs them is selected."""
    import importlib.util

    needs = any(
        "deepspeed_ops" in getattr(i, "fixturenames", ()) or i.get_closest_marker("dist")
        for i in items
    )
    if needs and not _ops_build and importlib.util.find_spec("deepspeed") is not None:
        log = OPS_LOGS
        log.mkdir(parents=True, exist_ok=True)
        for op in ("shm", "adam"):
            _ops_build[op] = subprocess.Popen(
                [sys.executable, "-c", WARM_OPS, op],
                stdout=open(log / f"build-{op}.log", "w"),  # noqa: SIM115 - lives past this call
                stderr=subprocess.STDOUT,
            )


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """DeepSpeed's CPU ops are compiled and cached (see TORCH_EXTENSIONS_DIR above)."""
    for op, proc in _ops_build.items():
        rc = proc.wait(timeout=900)
        log = OPS_LOGS / f"build-{op}.log"
        assert rc == 0, f"compiling DeepSpeed's {op} op failed:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-bert")
    make_tiny.make_bert(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny.make_llama(out)
    return out


@pytest.fixture(scope="session")
def quant_llama(tmp_path_factory) -> Path:
    """The tiny Llama with widths bitsandbytes quantizes on every backend: each linear
    layer's input and output a multiple of its 64-element block (the CPU repack of
    bitsandbytes' inference path, taken on AVX512-BF16 CPUs, needs that)."""
    out = tmp_path_factory.mktemp("quant-llama")
    make_tiny.make_llama(out, hidden_size=64, intermediate_size=128, num_key_value_heads=4)
    return out


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cls-data")
    return {
        "train": make_tiny.write_jsonl(d / "train.jsonl", make_tiny.sentiment_rows(96, seed=0)),
        "eval": make_tiny.write_jsonl(d / "eval.jsonl", make_tiny.sentiment_rows(32, seed=1)),
    }


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chat-data")
    return {
        "train": make_tiny.write_jsonl(d / "train.jsonl", make_tiny.chat_rows(64, seed=0)),
        "eval": make_tiny.write_jsonl(d / "eval.jsonl", make_tiny.chat_rows(16, seed=1)),
    }


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def cls_recipe(tmp_path, tiny_bert, cls_data) -> Path:
    """A complete classification recipe on the tiny encoder; output under tmp_path/run."""
    return write_recipe(
        tmp_path / "cls.yaml",
        f"""\
task: sequence_classification
model:
  name_or_path: {tiny_bert}
data:
  format: text_classification
  train: {cls_data["train"]}
  eval: {cls_data["eval"]}
  max_length: 32
train:
  epochs: 8
  micro_batch_size: 8
  lr: 3.0e-3
  log_every: 4
  eval_every: 24
  seed: 3
output:
  dir: {tmp_path / "run"}
""",
    )


@pytest.fixture
def chat_recipe(tmp_path, tiny_llama, chat_data) -> Path:
    return write_recipe(
        tmp_path / "chat.yaml",
        f"""\
task: causal_lm
model:
  name_or_path: {tiny_llama}
data:
  format: chat
  train: {chat_data["train"]}
  eval: {chat_data["eval"]}
  max_length: 64
adapter:
  type: lora
  r: 8
  alpha: 16
  dropout: 0.0
train:
  max_steps: 16
  micro_batch_size: 8
  lr: 1.0e-2
  log_every: 1
  eval_every: 8
output:
  dir: {tmp_path / "chat-run"}
""",
    )
