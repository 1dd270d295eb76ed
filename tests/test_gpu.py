"""GPU checks (skipped without CUDA): the same loop on a GPU, bf16, fast dropout stays off."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.cli.main import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_classification_on_gpu_bf16(cls_recipe, tmp_path):
    assert main(["train", str(cls_recipe), "-o", "train.precision=bf16"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_eval"]["accuracy"] >= 0.9
    assert summary.get("peak_gpu_mb", 0) > 0


def test_lora_chat_on_gpu(chat_recipe, tmp_path):
    assert main(["train", str(chat_recipe), "-o", "train.precision=bf16"]) == 0
    records = [
        json.loads(x) for x in (tmp_path / "chat-run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r["eval_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_chat_on_gpu_bf16(chat_recipe, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    rc = main(
        ["train", str(chat_recipe), "-o", "train.precision=bf16", "-o", f"quant.bits={bits}"]
        + ["-o", "quant.compute_dtype=bfloat16", "-o", "model.gradient_checkpointing=true"]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "chat-run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary.get("peak_gpu_mb", 0) > 0
    evals = [
        json.loads(x)["eval_loss"]
        for x in (tmp_path / "chat-run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "eval"
    ]
    assert evals[-1] < evals[0]
