"""`ftl train` end to end on tiny models: run folder, loadable outputs, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.cli.main import main
from launcher.train.report import read_metrics


def run_files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir()}


def test_classification_run_folder_and_reload(cls_recipe, tmp_path, capsys):
    assert main(["train", str(cls_recipe)]) == 0
    run = tmp_path / "run"
    assert {"recipe.yaml", "metrics.jsonl", "summary.json", "loss.png", "model"} <= run_files(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 96
    assert (
        summary["tokens_per_s"] > 0 and summary["samples_per_s"] > 0 and summary["peak_rss_mb"] > 0
    )
    assert summary["final_eval"]["accuracy"] >= 0.9  # the sentiment words are learnable
    assert 0.0 <= summary["final_eval"]["macro_f1"] <= 1.0
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(train[0])
    assert [r["step"] for r in records if r["kind"] == "eval"] == [24, 48, 72, 96]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        logits = model(
            **tok(["the movie was great good", "awful bad film"], return_tensors="pt", padding=True)
        ).logits
    assert logits.argmax(-1).tolist() == [1, 0]
    assert (run / "model" / "model.safetensors").is_file()


def test_chat_lora_lowers_eval_loss_and_adapter_reloads(chat_recipe, tmp_path, tiny_llama):
    assert main(["train", str(chat_recipe)]) == 0
    run = tmp_path / "chat-run"
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "perplexity" in evals[-1]
    adapter = run / "model"
    assert (adapter / "adapter_model.safetensors").is_file() and (
        adapter / "adapter_config.json"
    ).is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.chat_template is not None  # the template travels with the model
    prompt = tok.apply_chat_template(
        [
            {"role": "system", "content": "answer with one word"},
            {"role": "user", "content": "say blue please"},
        ],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1] :]).startswith("blue")


def test_full_causal_lm_completion_saves_plain_model(tmp_path, tiny_llama, chat_data):
    data = tmp_path / "text.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "the cat sat on the mat"}) + "\n" for _ in range(16))
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
model: {{name_or_path: {tiny_llama}}}
data: {{format: completion, train: {data}, eval_split: 0.25}}
train: {{max_steps: 4, micro_batch_size: 4, lr: 1.0e-3, precision: bf16}}
output: {{dir: {tmp_path / "out"}}}
""")
    assert main(["train", str(recipe)]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert model.config.vocab_size > 0


def test_l2sp_keeps_weights_closer_to_start(tmp_path, tiny_bert, cls_data):
    from safetensors.torch import load_file

    start = load_file(tiny_bert / "model.safetensors")

    def distance(l2sp: float) -> float:
        out = tmp_path / f"l2sp-{l2sp}"
        recipe = tmp_path / f"l2sp-{l2sp}.yaml"
        recipe.write_text(f"""\
task: sequence_classification
model: {{name_or_path: {tiny_bert}}}
data: {{format: text_classification, train: {cls_data["train"]}, max_length: 32}}
train: {{max_steps: 12, micro_batch_size: 8, lr: 1.0e-2, l2sp: {l2sp}, seed: 1}}
output: {{dir: {out}}}
""")
        assert main(["train", str(recipe)]) == 0
        tuned = load_file(out / "model" / "model.safetensors")
        # every pretrained tensor (the new head is excluded: it has no start value)
        return sum(
            float(((tuned["bert." + k] if "bert." + k in tuned else tuned[k]) - v).pow(2).sum())
            for k, v in start.items()
            if ("bert." + k in tuned or k in tuned)
        )

    free, held = distance(0.0), distance(1.0)
    assert held < 0.5 * free, (held, free)


def test_report_to_tensorboard_writes_events(cls_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    assert (
        main(
            [
                "train",
                str(cls_recipe),
                "-o",
                "output.report_to=[tensorboard]",
                "-o",
                "train.max_steps=2",
            ]
        )
        == 0
    )
    events = list((tmp_path / "run" / "trackers").rglob("events.out.tfevents.*"))
    assert events


def test_nonfinite_loss_stops_cleanly(cls_recipe, tmp_path):
    rc = main(
        [
            "train",
            str(cls_recipe),
            "-o",
            "train.lr=1e30",
            "-o",
            "train.max_grad_norm=null",
            "-o",
            "train.max_steps=20",
            "-o",
            "train.eval_every=null",
        ]
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert rc == 1 and summary["status"] == "diverged" and summary["steps"] < 20
    assert not (tmp_path / "run" / "model").exists()  # a diverged model is not exported


def test_early_stopping_stops_after_patience(cls_recipe, tmp_path):
    # min_delta so large that no eval counts as an improvement after the first
    assert (
        main(
            [
                "train",
                str(cls_recipe),
                "-o",
                "train.early_stopping={metric: accuracy, patience: 2, min_delta: 5}",
                "-o",
                "train.eval_every=3",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "early_stopped" and summary["steps"] == 9  # evals at 3 (best), 6, 9
    assert (tmp_path / "run" / "model").is_dir()


def test_eval_at_start_gives_a_baseline(chat_recipe, tmp_path):
    assert (
        main(
            [
                "train",
                str(chat_recipe),
                "-o",
                "train.eval_at_start=true",
                "-o",
                "train.max_steps=2",
                "-o",
                "train.eval_every=null",
            ]
        )
        == 0
    )
    steps = [
        r["step"]
        for r in read_metrics(tmp_path / "chat-run" / "metrics.jsonl")
        if r["kind"] == "eval"
    ]
    assert steps == [0, 2]


def test_report_to_wandb_offline_without_network(cls_recipe, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert (
        main(
            ["train", str(cls_recipe), "-o", "output.report_to=[wandb]", "-o", "train.max_steps=2"]
        )
        == 0
    )
    runs = list((tmp_path / "run" / "trackers").rglob("offline-run-*"))
    assert runs, list((tmp_path / "run").rglob("*"))[:20]


def test_qlora_4bit_on_cpu(chat_recipe, tmp_path, quant_llama):
    pytest.importorskip("bitsandbytes")
    assert (
        main(
            [
                "train",
                str(chat_recipe),
                "-o",
                f"model.name_or_path={quant_llama}",
                "-o",
                "quant.bits=4",
                "-o",
                "quant.compute_dtype=float32",
                "-o",
                "train.max_steps=4",
                "-o",
                "train.eval_every=null",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "chat-run" / "summary.json").read_text())
    assert (
        summary["status"] == "completed" and summary["trainable_parameters"] < summary["parameters"]
    )
    assert (tmp_path / "chat-run" / "model" / "adapter_model.safetensors").is_file()
