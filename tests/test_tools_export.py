"""`ftl export`: bundles checked by the loaders that will serve them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama, chat_data) -> Path:
    d = tmp_path_factory.mktemp("export")
    recipe = d / "r.yaml"
    recipe.write_text(
        f"""\
model: {{name_or_path: {tiny_llama}}}
data: {{format: chat, train: {chat_data["train"]}, max_length: 64}}
adapter: {{type: lora, r: 4, alpha: 8, dropout: 0.0}}
train: {{max_steps: 4, micro_batch_size: 8, lr: 1.0e-2, log_every: 1}}
output: {{dir: {d / "run"}}}
"""
    )
    assert main(["train", str(recipe)]) == 0
    return d / "run"


def test_hf_bundle_of_an_adapter_run_loads_generates_and_stops_like_training(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "bundle"
    assert main(["export", str(lora_run), "--format", "hf", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    tok = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.eos_token_id in eos and gen.pad_token_id == tok.pad_token_id
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # the bundle is the trained model: equal to the adapter on its base
    base = json.loads((lora_run / "model" / "adapter_config.json").read_text())
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base["base_model_name_or_path"]), lora_run / "model"
    )
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-5
    out_ids = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out_ids.shape[1] > ids.shape[1]


def test_vllm_lora_bundle_and_what_vllm_cannot_serve(lora_run, tmp_path, capsys):
    out = tmp_path / "vllm"
    script = ROOT / "tools" / "export_model.py"
    done = subprocess.run(
        [sys.executable, str(script), str(lora_run), "--format", "vllm-lora", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "vllm serve" in done.stdout and "--enable-lora" in done.stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and not cfg.get("use_dora")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), out
    )
    # a DoRA adapter with modules_to_save: refused, each reason named, nothing written
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in (lora_run / "model").iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    bad = {**cfg, "use_dora": True, "modules_to_save": ["lm_head"]}
    (dora / "adapter_config.json").write_text(json.dumps(bad))
    rc = main(["export", str(dora), "--format", "vllm-lora", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "vLLM cannot serve" in err and "use_dora" in err and "modules_to_save" in err
    assert "--format hf" in err and not (tmp_path / "no").exists()


def test_export_bad_input(lora_run, tmp_path, capsys):
    rc = main(["export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "neither a model" in err and "ftl convert" in err
    base = json.loads((lora_run / "model" / "adapter_config.json").read_text())
    full = Path(base["base_model_name_or_path"])
    rc = main(["export", str(full), "--format", "vllm-lora", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "full model, not an adapter" in err
