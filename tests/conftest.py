"""Shared fixtures: tiny models, tokenizers and data, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent / "assets"))

import make_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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
